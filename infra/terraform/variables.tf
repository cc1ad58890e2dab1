variable "project" {
  description = "Google Cloud project ID."
  type        = string
}

variable "region" {
  description = "Region for Vertex AI, the bucket, Artifact Registry and the function."
  type        = string
  default     = "us-central1"
}

variable "environment" {
  description = "Short environment name (dev, prod); prefixes every resource."
  type        = string
}

variable "artifact_retention_days" {
  description = "Pipeline artifacts older than this are deleted."
  type        = number
  default     = 30
}

variable "data_prefix" {
  description = "Objects under this prefix of the data bucket trigger a retraining run."
  type        = string
  default     = "incoming/"
}

variable "drift_threshold" {
  description = "Mean shift, in training standard deviations, that counts as drift (0 = no drift check)."
  type        = number
  default     = 0.5
}

variable "pipeline_template_uri" {
  description = "Artifact Registry template URI of the published pipeline (torchship publish)."
  type        = string
}

variable "schedule_cron" {
  description = "Cron for the scheduled retraining run; empty for none."
  type        = string
  default     = ""
}

variable "schedule_time_zone" {
  description = "Time zone of schedule_cron."
  type        = string
  default     = "Etc/UTC"
}
