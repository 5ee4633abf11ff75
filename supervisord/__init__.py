"""claude-pm-supervisord: supervise AI-agent process trees and stop runaway memory."""

__version__ = "0.1.0"
