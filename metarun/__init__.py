"""metarun: a config-driven meta-learning experiment runner."""
