"""The neuroada inference server: one frozen base model, many sparse-delta adapters, over HTTP."""
