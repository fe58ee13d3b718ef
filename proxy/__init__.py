"""meterproxy: an OpenAI-compatible metering reverse proxy for AI agents."""

__version__ = "0.1.0"
