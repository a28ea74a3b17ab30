//! PNG output with generation parameters.
