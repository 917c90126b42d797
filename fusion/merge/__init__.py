"""Pure tensor functions of model merging.

Everything here maps state dicts (``dict[str, Tensor]``) or *stacked task vectors*
(``dict[str, Tensor]`` whose tensors carry a leading task dimension ``K``) to tensors.
Nothing here imports Lightning or Hydra; the static methods and the learned
parametrizations call the same functions, so each algorithm exists once.
"""
