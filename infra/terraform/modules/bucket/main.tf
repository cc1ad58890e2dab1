# The pipeline bucket: pipeline root, training statistics, incoming data; old artifacts expire.
variable "name" { type = string }
variable "region" { type = string }
variable "retention_days" { type = number }

resource "google_storage_bucket" "pipelines" {
  name                        = var.name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  lifecycle_rule {
    condition {
      age            = var.retention_days
      matches_prefix = ["pipeline-root/"]
    }
    action {
      type = "Delete"
    }
  }
}

output "name" { value = google_storage_bucket.pipelines.name }
