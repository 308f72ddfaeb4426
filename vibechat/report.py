"""The run's report card: each phase logs a section; generate() assembles report.md. Filled in by issue 6."""

import os
from datetime import datetime

from vibechat.common import get_base_dir, get_dist_info
from vibechat.storage import open_store


def _slug(section: str) -> str:
    return section.lower().replace(" ", "-").replace("/", "-")


class Report:
    def __init__(self, report_dir: str):
        self.report_dir = report_dir
        self.store = open_store(report_dir)

    def log(self, section: str, data: list) -> str:
        lines = [f"## {section}", f"timestamp: {datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {k}: {v}" for k, v in item.items()]
            elif item:
                lines.append(str(item))
        key = f"{_slug(section)}.md"
        self.store.put_text(key, "\n".join(lines) + "\n\n")
        return self.store.uri(key)

    def generate(self) -> str:
        parts = [self.store.get_text(k) for k in self.store.list("") if k.endswith(".md") and k != "report.md"]
        self.store.put_text("report.md", "# vibechat report\n\n" + "".join(parts))
        return self.store.uri("report.md")

    def reset(self) -> None:
        for key in self.store.list(""):
            self.store.delete(key)


class DummyReport:
    def log(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def get_report() -> "Report | DummyReport":
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(get_base_dir().rstrip("/") + "/report")
