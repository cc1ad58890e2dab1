# Artifact Registry: a Docker repository for the images, a KFP repository for pipeline templates.
variable "name" { type = string }
variable "region" { type = string }

resource "google_artifact_registry_repository" "images" {
  repository_id = var.name
  location      = var.region
  format        = "DOCKER"
  description   = "torchship component and Triton serving images"
}

resource "google_artifact_registry_repository" "pipelines" {
  repository_id = "${var.name}-pipelines"
  location      = var.region
  format        = "KFP"
  description   = "torchship compiled pipelines"
}

output "docker_repository" {
  value = "${var.region}-docker.pkg.dev/${google_artifact_registry_repository.images.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "kfp_host" {
  value = "https://${var.region}-kfp.pkg.dev/${google_artifact_registry_repository.pipelines.project}/${google_artifact_registry_repository.pipelines.repository_id}"
}
