# A scheduled retraining run: Cloud Scheduler creates a Vertex AI PipelineJob from the published
# template on a cron, as the pipeline's service account. (`torchship schedule create` makes a
# Vertex AI PipelineJobSchedule instead, for teams that manage schedules outside Terraform.)
variable "project" { type = string }
variable "region" { type = string }
variable "name" { type = string }
variable "cron" { type = string }
variable "time_zone" { type = string }
variable "pipeline_template_uri" { type = string }
variable "pipeline_root" { type = string }
variable "pipeline_sa_email" { type = string }

resource "google_cloud_scheduler_job" "retrain" {
  name      = var.name
  region    = var.region
  schedule  = var.cron
  time_zone = var.time_zone

  http_target {
    http_method = "POST"
    uri         = "https://${var.region}-aiplatform.googleapis.com/v1/projects/${var.project}/locations/${var.region}/pipelineJobs"
    headers     = { "Content-Type" = "application/json" }
    body = base64encode(jsonencode({
      displayName    = "torchship-scheduled"
      templateUri    = var.pipeline_template_uri
      serviceAccount = var.pipeline_sa_email
      runtimeConfig  = { gcsOutputDirectory = var.pipeline_root }
      labels         = { trigger = "schedule" }
    }))
    oauth_token {
      service_account_email = var.pipeline_sa_email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }
}
