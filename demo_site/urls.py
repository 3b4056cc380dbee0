from django.contrib import admin
from django.urls import path

from demo_site.demo import views

urlpatterns = [
    path("", views.home, name="home"),
    path("add/", views.enqueue_add, name="enqueue-add"),
    path("result/<str:task_id>/", views.result, name="result"),
    path("admin/", admin.site.urls),
]
