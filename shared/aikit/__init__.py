"""aikit: usage-based billing for LLM APIs (metering, limits, Stripe billing)."""

__version__ = "0.1.0"
