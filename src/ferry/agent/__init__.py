"""The chassis agent: runs the core against a real store, OVSDB and OpenFlow switch."""
