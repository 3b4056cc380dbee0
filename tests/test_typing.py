"""What a project's type checker sees of our tasks: the calls checked against the function."""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent

#: A project's code; the lines marked "# E" are mistakes mypy must report, and only those.
SNIPPET = """\
from django.tasks import TaskContext

from django_tasks import task


@task
def add(x: int, y: int) -> int:
    return x + y


@task(bind=True, queue="hipri")
def bound(self, text: str) -> str:
    return text


@task(takes_context=True)
def with_context(context: TaskContext, n: int) -> None:
    pass


add.delay(1, 2)
add.delay(1, "x")  # E
add.delay(1)  # E
add.delay(1, 2, z=3)  # E
total: int = add(1, 2)
wrong: str = add(1, 2)  # E
bound.delay("a")
bound.delay(1)  # E
with_context.delay(3)
with_context.delay("3")  # E
add.apply_async((1, 2), countdown=5)
add.enqueue(1, 2)
"""


def test_mypy_checks_task_calls_against_the_function(tmp_path: Path) -> None:
    project = tmp_path / "shop_tasks.py"
    project.write_text(SNIPPET)
    report, errors, _status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "cache"),
        str(project),
    ])  # fmt: skip
    assert not errors, errors
    reported = {int(n) for n in re.findall(rf"^{re.escape(str(project))}:(\d+): error", report,
                                           re.MULTILINE)}  # fmt: skip
    expected = {n for n, line in enumerate(SNIPPET.splitlines(), 1) if line.endswith("# E")}
    assert reported == expected, report
