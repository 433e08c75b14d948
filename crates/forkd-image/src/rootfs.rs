//! Root filesystem images (placeholder until written).
