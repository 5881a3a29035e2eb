"""The network lab (emulated links between namespaces) and calibration against it."""
