# A scheduled retraining run: Cloud Scheduler creates a Vertex AI PipelineJob from the published
# template on a cron, as the pipeline's service account, with the given parameter values
# (runtimeConfig.parameterValues: data_source, deploy_target, ...). (`torchship schedule create`
# makes a Vertex AI PipelineJobSchedule instead, for teams that manage schedules outside Terraform.)
#
# Every run passes reference_uri, so a deploying run keeps the reference (training statistics,
# serving record) where the trigger reads it.
#
# Caching: the PipelineJob REST resource has no caching field (the SDK's enable_caching rewrites
# the pipeline spec on the client before it is sent), so a run created from templateUri caches as
# the template was compiled. The compiled template turns caching off for prepare-data: every run
# reads its data afresh, so every task after it gets new inputs and runs again. A schedule with the
# same parameter values every time therefore retrains on the data present when it runs.
variable "project" { type = string }
variable "region" { type = string }
variable "name" { type = string }
variable "cron" { type = string }
variable "time_zone" { type = string }
variable "pipeline_template_uri" { type = string }
variable "pipeline_root" { type = string }
variable "pipeline_sa_email" { type = string }

variable "parameter_values" {
  type    = any
  default = {}
}

# Where a deploying run keeps the reference the trigger reads.
variable "reference_uri" { type = string }

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
      runtimeConfig = {
        gcsOutputDirectory = var.pipeline_root
        parameterValues    = merge(var.parameter_values, { reference_uri = var.reference_uri })
      }
      labels = { trigger = "schedule" }
    }))
    oauth_token {
      service_account_email = var.pipeline_sa_email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }
}
