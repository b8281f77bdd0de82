"""The mixture itself: config, experts, X-LoRA layers, classifier, the two passes, generation, merging."""
