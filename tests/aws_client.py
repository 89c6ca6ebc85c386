"""Our suite's boto3 helpers: ``localproxy.testing.aws``."""

from localproxy.testing.aws import CALL_TIMEOUT, api_for, call

__all__ = ["CALL_TIMEOUT", "api_for", "call"]
