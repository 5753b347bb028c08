"""granular-po: SFT, DPO and TDPO where each token's contribution is weighted by highlighted spans."""

__version__ = "0.1.0"
