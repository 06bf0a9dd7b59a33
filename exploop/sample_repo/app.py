"""Demo service scanned by `exploop up`: it carries deliberately planted secrets."""
import os

# Planted for the demo: AWS's documented example key, never a real one.
AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def handler(event):
    return {"region": os.environ.get("AWS_REGION", "us-east-1"), "event": event}
