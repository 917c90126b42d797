"""Merge parametrizations: ``nn.Module``s over frozen task vectors whose parameters are what learned methods train."""
