"""Views that enqueue tasks and show their results."""

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.http import require_GET, require_POST

from django_tasks import AsyncResult
from django_tasks.models import TaskResult

from .tasks import add

PAGE = """<!doctype html>
<title>django_tasks demo</title>
<h1>django_tasks demo</h1>
<form method="post" action="/add/">
  <input type="hidden" name="csrfmiddlewaretoken" value="{csrf}">
  <input name="x" value="2" size="4"> + <input name="y" value="2" size="4">
  <button>Enqueue add()</button>
</form>
<p>The <a href="/admin/">admin</a> lists task results and workers.</p>
<h2>Latest results</h2>
<ul>{rows}</ul>
"""


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    rows = "".join(
        f"<li>{r.task_name} {json.dumps(r.args)} &rarr; {r.state} {json.dumps(r.result)}</li>"
        for r in TaskResult.objects.order_by("-enqueued_at")[:10]
    )
    page = PAGE.format(rows=rows or "<li>none yet</li>", csrf=get_token(request))
    return HttpResponse(page)


@require_POST
def enqueue_add(request: HttpRequest) -> JsonResponse:
    try:
        x, y = int(request.POST.get("x", "0")), int(request.POST.get("y", "0"))
    except ValueError:
        return JsonResponse({"error": "x and y must be whole numbers"}, status=400)
    result = add.delay(x, y)
    return JsonResponse({"task_id": result.id, "result_url": f"/result/{result.id}/"})


@require_GET
def result(request: HttpRequest, task_id: str) -> JsonResponse:
    outcome = AsyncResult(task_id)
    value = outcome.result if outcome.successful() else None
    return JsonResponse({"task_id": task_id, "state": outcome.state, "result": value})
