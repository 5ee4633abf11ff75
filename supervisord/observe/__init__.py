"""What the daemon tells: record logs, metrics, webhooks, reports, top."""
