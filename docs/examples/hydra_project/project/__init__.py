"""A minimal user project: a classifier and its data module, as in lightning-hydra-template."""
