//! The merged-registry model (placeholder; filled in by the registry work).
