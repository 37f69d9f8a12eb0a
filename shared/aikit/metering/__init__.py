from aikit.metering.base import Meter, UsageEvent, new_request_id

__all__ = ["Meter", "UsageEvent", "new_request_id"]
