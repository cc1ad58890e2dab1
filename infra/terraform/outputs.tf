output "pipeline_root" {
  value = local.pipeline_root
}

output "data_bucket" {
  description = "New data goes under gs://DATA_BUCKET/DATA_PREFIX; the trigger watches only this bucket."
  value       = module.data_bucket.name
}

output "reference_uri" {
  description = "What serves now: statistics.json (training statistics) and serving.json (the serving record)."
  value       = local.reference_uri
}

output "decisions_uri" {
  description = "The trigger's decision records (submitted / skipped, and why)."
  value       = "${local.reference_uri}decisions/"
}

output "docker_repository" {
  value = module.registry.docker_repository
}

output "pipeline_template_host" {
  description = "Pass to `torchship publish --host`."
  value       = module.registry.kfp_host
}

output "pipeline_service_account" {
  value = module.service_account.email
}

output "trigger_service_account" {
  value = module.trigger.service_account
}
