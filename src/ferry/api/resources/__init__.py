"""The API's resources, one module per Neutron collection."""
