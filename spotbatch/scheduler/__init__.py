"""The hybrid scheduler: on-demand baseline + spot burst + fallback, prices, the usage
ledger, cost reports and the trace-driven policy simulator."""
