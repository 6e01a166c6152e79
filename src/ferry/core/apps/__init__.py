"""Apps: each owns some pipeline tables and turns the local view into flows for them."""
