"""Cost and usage reports from the SQL ledger: usage per group, and what self-hosting, edge nodes and the
cache saved.

`usage_report` and `savings_report` are synchronous SQL (run them in a worker thread from the event loop);
`render` turns either report into JSON, CSV or a rich table. Money is integer micro-dollars throughout.
"""

from gateway.reports.model import Dimension, Report, ReportQuery, ReportRow, Source, parse_query
from gateway.reports.query import usage_report
from gateway.reports.savings import ReferencePrice, SavingsReport, SavingsRow, ServedBy, savings_report

__all__ = [
    "Dimension",
    "ReferencePrice",
    "Report",
    "ReportQuery",
    "ReportRow",
    "SavingsReport",
    "SavingsRow",
    "ServedBy",
    "Source",
    "parse_query",
    "savings_report",
    "usage_report",
]
