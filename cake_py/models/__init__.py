"""Pure-torch model code: configs, architectures, weights, tokenizer and sampling. Knows nothing of the cluster."""
