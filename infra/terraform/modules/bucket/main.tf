# A bucket: the pipeline bucket (pipeline root, references, function source) or the data bucket
# (new data the trigger watches). Objects under expire_prefixes are deleted after retention_days;
# with versioning, older generations are kept (deleted noncurrent_retention_days after they are
# replaced, when that is set).
variable "name" { type = string }
variable "region" { type = string }

variable "retention_days" {
  type    = number
  default = 0 # 0: nothing expires
}

variable "expire_prefixes" {
  type    = list(string)
  default = []
}

variable "versioning" {
  type    = bool
  default = false
}

variable "noncurrent_retention_days" {
  type    = number
  default = 0 # 0: older generations are kept
}

# (named "pipelines" from when this module made only the pipeline bucket; renaming it would
# replace the bucket in existing state)
resource "google_storage_bucket" "pipelines" {
  name                        = var.name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = var.versioning
  }

  dynamic "lifecycle_rule" {
    for_each = var.retention_days > 0 && length(var.expire_prefixes) > 0 ? [1] : []
    content {
      condition {
        age            = var.retention_days
        matches_prefix = var.expire_prefixes
      }
      action {
        type = "Delete"
      }
    }
  }

  dynamic "lifecycle_rule" {
    for_each = var.versioning && var.noncurrent_retention_days > 0 ? [1] : []
    content {
      condition {
        days_since_noncurrent_time = var.noncurrent_retention_days
      }
      action {
        type = "Delete"
      }
    }
  }
}

output "name" { value = google_storage_bucket.pipelines.name }
