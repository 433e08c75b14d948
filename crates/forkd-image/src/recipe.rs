//! Recipes (placeholder until written).
