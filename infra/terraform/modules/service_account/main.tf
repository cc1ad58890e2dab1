# The pipeline's service account, with only what a run needs: run Vertex AI jobs and deploy
# models, read and write its own bucket, read the data bucket, pull images, write logs.
variable "project" { type = string }
variable "name" { type = string }
variable "bucket" { type = string }
variable "data_bucket" { type = string }

resource "google_service_account" "pipeline" {
  account_id   = var.name
  display_name = "torchship pipeline (${var.name})"
}

locals {
  project_roles = [
    "roles/aiplatform.user",         # pipeline jobs, custom jobs, models, endpoints
    "roles/artifactregistry.reader", # pull component images and pipeline templates
    "roles/logging.logWriter",
  ]
}

resource "google_project_iam_member" "pipeline" {
  for_each = toset(local.project_roles)
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_storage_bucket_iam_member" "pipeline" {
  bucket = var.bucket
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_storage_bucket_iam_member" "pipeline_reads_data" {
  bucket = var.data_bucket
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

# Vertex AI runs custom jobs as this account: the account must be allowed to act as itself.
resource "google_service_account_iam_member" "act_as_self" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.pipeline.email}"
}

output "email" { value = google_service_account.pipeline.email }
