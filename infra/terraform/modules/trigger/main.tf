# The retraining trigger: a Cloud Function (infra/trigger) behind an Eventarc storage-finalize
# trigger on the pipeline bucket; it submits the pipeline once per new object generation.
variable "project" { type = string }
variable "region" { type = string }
variable "name" { type = string }
variable "bucket" { type = string }
variable "data_prefix" { type = string }
variable "drift_threshold" { type = number }
variable "pipeline_template_uri" { type = string }
variable "pipeline_root" { type = string }
variable "statistics_uri" { type = string }
variable "pipeline_sa_email" { type = string }
variable "source_dir" { type = string }

data "archive_file" "source" {
  type        = "zip"
  source_dir  = var.source_dir
  output_path = "${path.root}/.terraform/${var.name}.zip"
}

resource "google_storage_bucket_object" "source" {
  name   = "functions/${var.name}-${data.archive_file.source.output_md5}.zip"
  bucket = var.bucket
  source = data.archive_file.source.output_path
}

resource "google_service_account" "trigger" {
  account_id   = substr(var.name, 0, 30)
  display_name = "torchship retraining trigger"
}

resource "google_project_iam_member" "trigger" {
  for_each = toset(["roles/aiplatform.user", "roles/eventarc.eventReceiver"])
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.trigger.email}"
}

resource "google_storage_bucket_iam_member" "trigger_reads_data" {
  bucket = var.bucket
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.trigger.email}"
}

# The trigger submits runs as the pipeline's account.
resource "google_service_account_iam_member" "trigger_acts_as_pipeline" {
  service_account_id = "projects/${var.project}/serviceAccounts/${var.pipeline_sa_email}"
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.trigger.email}"
}

data "google_storage_project_service_account" "gcs" {}

# Cloud Storage publishes the events Eventarc delivers.
resource "google_project_iam_member" "gcs_publishes" {
  project = var.project
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_cloudfunctions2_function" "trigger" {
  name     = var.name
  location = var.region

  build_config {
    runtime     = "python311"
    entry_point = "on_new_data"
    source {
      storage_source {
        bucket = var.bucket
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    max_instance_count    = 3
    available_memory      = "1Gi"
    timeout_seconds       = 300
    service_account_email = google_service_account.trigger.email
    environment_variables = {
      PROJECT           = var.project
      REGION            = var.region
      PIPELINE_TEMPLATE = var.pipeline_template_uri
      PIPELINE_ROOT     = var.pipeline_root
      DATA_PREFIX       = "gs://${var.bucket}/${var.data_prefix}"
      SERVICE_ACCOUNT   = var.pipeline_sa_email
      STATISTICS_URI    = var.drift_threshold > 0 ? var.statistics_uri : ""
      DRIFT_THRESHOLD   = tostring(var.drift_threshold)
    }
  }

  event_trigger {
    trigger_region        = var.region
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.trigger.email
    event_filters {
      attribute = "bucket"
      value     = var.bucket
    }
  }

  depends_on = [google_project_iam_member.gcs_publishes]
}
