# The retraining trigger: a Cloud Function (infra/trigger) behind an Eventarc storage-finalize
# trigger on the data bucket (never the pipeline bucket, so the pipeline's own artifacts do not
# wake it); it submits the pipeline once per new object generation under the data prefix, reads
# the reference (training statistics, serving record) and writes its decisions next to it.
variable "project" { type = string }
variable "region" { type = string }
variable "name" { type = string }
variable "pipeline_bucket" { type = string }
variable "data_bucket" { type = string }
variable "data_prefix" { type = string }
variable "reference_uri" { type = string }
# Parameter values of every triggered run (PARAMETER_VALUES); the function adds data_source,
# label_column and reference_uri.
variable "parameter_values" { type = any }
variable "drift_threshold" { type = number }
variable "psi_threshold" { type = number }
variable "label_drift_threshold" { type = number }
variable "feature_thresholds" {
  type    = map(map(number))
  default = {}
}
variable "pipeline_template_uri" { type = string }
variable "pipeline_root" { type = string }
variable "pipeline_sa_email" { type = string }
variable "source_dir" { type = string }

locals {
  # The reference folder as an object prefix of the pipeline bucket.
  reference_prefix = trimprefix(var.reference_uri, "gs://${var.pipeline_bucket}/")
}

data "archive_file" "source" {
  type        = "zip"
  source_dir  = var.source_dir
  output_path = "${path.root}/.terraform/${var.name}.zip"
}

resource "google_storage_bucket_object" "source" {
  name   = "functions/${var.name}-${data.archive_file.source.output_md5}.zip"
  bucket = var.pipeline_bucket
  source = data.archive_file.source.output_path
}

resource "google_service_account" "trigger" {
  account_id   = substr(var.name, 0, 30)
  display_name = "torchship retraining trigger"
}

resource "google_project_iam_member" "trigger" {
  for_each = toset([
    "roles/aiplatform.user",         # submit pipeline jobs
    "roles/artifactregistry.reader", # the SDK downloads the pipeline template as the caller
    "roles/eventarc.eventReceiver",  # receive the Eventarc events
  ])
  project = var.project
  role    = each.value
  member  = "serviceAccount:${google_service_account.trigger.email}"
}

resource "google_storage_bucket_iam_member" "trigger_reads_data" {
  bucket = var.data_bucket
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.trigger.email}"
}

# Read the reference and write decisions under it; nothing else in the pipeline bucket.
resource "google_storage_bucket_iam_member" "trigger_uses_reference" {
  bucket = var.pipeline_bucket
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.trigger.email}"
  condition {
    title       = "reference-only"
    description = "Objects under ${local.reference_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${var.pipeline_bucket}/objects/${local.reference_prefix}\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${local.reference_prefix}\")"
  }
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
        bucket = var.pipeline_bucket
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
      PROJECT               = var.project
      REGION                = var.region
      PIPELINE_TEMPLATE     = var.pipeline_template_uri
      PIPELINE_ROOT         = var.pipeline_root
      DATA_PREFIX           = "gs://${var.data_bucket}/${var.data_prefix}"
      SERVICE_ACCOUNT       = var.pipeline_sa_email
      REFERENCE_URI         = var.reference_uri
      DRIFT_THRESHOLD       = tostring(var.drift_threshold)
      PSI_THRESHOLD         = tostring(var.psi_threshold)
      LABEL_DRIFT_THRESHOLD = tostring(var.label_drift_threshold)
      FEATURE_THRESHOLDS    = jsonencode(var.feature_thresholds)
      PARAMETER_VALUES      = jsonencode(var.parameter_values)
    }
  }

  event_trigger {
    trigger_region        = var.region
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.trigger.email
    event_filters {
      attribute = "bucket"
      value     = var.data_bucket
    }
  }

  depends_on = [google_project_iam_member.gcs_publishes]
}

# Eventarc calls the function's Cloud Run service as the trigger's account.
resource "google_cloud_run_v2_service_iam_member" "trigger_invokes" {
  project  = var.project
  location = var.region
  name     = google_cloudfunctions2_function.trigger.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.trigger.email}"
}

output "service_account" { value = google_service_account.trigger.email }
output "function" { value = google_cloudfunctions2_function.trigger.name }
