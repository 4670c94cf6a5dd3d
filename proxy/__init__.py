"""paywall-proxy: a self-hosted, OpenAI-compatible metering reverse proxy."""

__version__ = "0.1.0"
