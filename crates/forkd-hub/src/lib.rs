//! Hub: snapshot packs, registry.json, pull / push and the static hub server.
