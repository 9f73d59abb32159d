"""What the destination tests share: quick retry options and a sample audience."""

from worker.destinations.http import HttpOptions
from worker.payloads import AudienceRef

# Retries that finish in milliseconds, so fault tests stay fast.
FAST = HttpOptions(
    connect_timeout=1.0, read_timeout=2.0, max_attempts=4, backoff_base=0.01, backoff_max=0.05
)
AUDIENCE = AudienceRef(id=42, key="order_completed_last_30days", name="Order Completed")
