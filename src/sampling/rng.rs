//! PyTorch CPU generator (mt19937 + randn), filled in by the RNG work.
