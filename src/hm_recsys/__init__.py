"""hm-recsys: two-tower retrieval for H&M fashion recommendations, run as a scheduled MLOps system."""

__version__ = "0.1.0"
