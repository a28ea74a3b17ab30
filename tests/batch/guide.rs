//! The swap-guide example files parse.
