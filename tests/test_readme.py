"""Every Python snippet of README.md works as written."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db.utils import ConnectionHandler

from django_tasks.backend import TasksBackend, get_backend
from tests.conftest import E2E

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def blocks_with(marker: str) -> list[str]:
    return [block for block in python_blocks() if marker in block]


@pytest.mark.django_db
def test_settings_snippets(tmp_path: Path) -> None:
    [settings_block] = blocks_with("INSTALLED_APPS")
    namespace: dict[str, Any] = {}
    exec(settings_block, namespace)
    assert "django_tasks" in namespace["INSTALLED_APPS"]
    backend = TasksBackend("default", namespace["TASKS"]["default"])
    assert backend.config.broker_kind == "redis"
    assert backend.check() == []

    [database_block] = blocks_with("DATABASES")
    namespace = {"BASE_DIR": tmp_path}
    exec(database_block, namespace)
    handler = ConnectionHandler(namespace["DATABASES"])
    connection = handler["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            assert cursor.fetchone()[0] == "wal"
    finally:
        connection.close()


@pytest.fixture
def shop_app(tmp_path: Path) -> Any:
    """The README's shop/tasks.py, importable here and by workers."""
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text("\n\n".join(blocks_with("# shop/tasks.py")))
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
            del sys.modules[name]


@pytest.mark.e2e
def test_calling_and_result_snippets(e2e_sqlite: E2E, shop_app: Path) -> None:
    e2e_sqlite.start_worker("-c", "1", "-Q", "default,hipri", PATH=shop_app,
                            IMPORTS=["shop.tasks"])  # fmt: skip
    snippets = [
        block
        for block in python_blocks()
        if "from shop.tasks import" in block or "from django_tasks import AsyncResult" in block
    ]
    assert len(snippets) == 3
    namespace: dict[str, Any] = {}
    for snippet in snippets:
        exec(snippet, namespace)
    assert namespace["result"].get(timeout=10) == 4


@pytest.mark.django_db(transaction=True)
def test_middleware_snippet(
    shop_app: Path, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from django_tasks.messages import decode
    from django_tasks.models import QueuedMessage, TaskResult
    from django_tasks.worker.consumer import Consumer
    from tests.conftest import tasks_setting

    [block] = blocks_with("# shop/middleware.py")
    (shop_app / "shop" / "middleware.py").write_text(block)
    [options] = [b for b in python_blocks() if '"MIDDLEWARE"' in b]
    settings.TASKS = tasks_setting(eval("{" + options + "}")["OPTIONS"])
    from shop.middleware import current_tenant
    from shop.tasks import add

    token = current_tenant.set("acme")
    try:
        result = add.delay(2, 2)
    finally:
        current_tenant.reset(token)
    body = QueuedMessage.objects.get(task_id=result.id).body
    assert decode(body).headers == {"tenant": "acme"}
    with caplog.at_level(logging.INFO, "shop"):
        Consumer(get_backend(), ["default"], "readme-0", burst=True).run()
    assert TaskResult.objects.get(pk=result.id).result == 4
    [line] = [r.getMessage() for r in caplog.records if r.name == "shop"]
    assert re.fullmatch(r"shop\.tasks\.add took \d+\.\d{3} s \(SUCCESS\)", line)
