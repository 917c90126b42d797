"""Model pools: a frozen pretrained encoder, its experts' weights and the frozen zero-shot heads."""
