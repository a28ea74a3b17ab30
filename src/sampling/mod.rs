//! Noise schedules, samplers and the PyTorch-compatible RNG.

pub mod rng;
