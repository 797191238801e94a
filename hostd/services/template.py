"""moru.host.v1.TemplateService: the templates built on this node (their manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hostd.errors import NotFound
from hostd.services.sandbox import ts
from hostd.validation import template as check_template
from images.manifest import TemplateManifest, TemplateNotFound, list_manifests, load_manifest
from moru_proto.host.v1 import template_pb2 as pb
from moru_proto.host.v1 import template_pb2_grpc


def template_info(m: TemplateManifest) -> pb.TemplateInfo:
    return pb.TemplateInfo(
        template_id=m.name,
        content_hash=m.content_hash,
        kernel_version=m.kernel_version,
        vcpus=m.defaults.vcpus,
        memory_mb=m.defaults.memory_mb,
        disk_mb=m.defaults.disk_mb,
        rootfs_bytes=m.rootfs_bytes,
        built_at=ts(m.built_at),
    )


class TemplateService(template_pb2_grpc.TemplateServiceServicer):
    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir

    async def List(
        self, request: pb.ListTemplatesRequest, context: Any
    ) -> pb.ListTemplatesResponse:
        return pb.ListTemplatesResponse(
            templates=[template_info(m) for m in list_manifests(self.images_dir)]
        )

    async def Get(self, request: pb.GetTemplateRequest, context: Any) -> pb.TemplateInfo:
        name = check_template(request.template_id)
        try:
            return template_info(load_manifest(name, self.images_dir))
        except TemplateNotFound as e:
            raise NotFound(str(e)) from None
