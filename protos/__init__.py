"""Protocol buffers (wire-compatible with inference.GRPCInferenceService) and datatypes."""
