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
  description = "Vertex AI run folders (pipeline-root/PROJECT_NUMBER/) older than this are deleted; the reference is kept."
  type        = number
  default     = 30
}

variable "data_prefix" {
  description = "Objects under this prefix of the data bucket trigger a retraining run."
  type        = string
  default     = "incoming/"
}

variable "data_noncurrent_retention_days" {
  description = "Days a replaced (noncurrent) generation of a data object is kept; 0 keeps every generation."
  type        = number
  default     = 0
}

variable "deploy_target" {
  description = "The pipeline's deploy_target whose reference the trigger reads (under pipeline-root/torchship-reference/torchship/DEPLOY_TARGET/)."
  type        = string
  default     = "vertex"
}

variable "drift_threshold" {
  description = "Jensen-Shannon distance between a numeric feature's binned distribution in the new data and in the training statistics above which the data counts as drifted."
  type        = number
  default     = 0.1
  validation {
    condition     = var.drift_threshold >= 0
    error_message = "drift_threshold is a distance: 0 or more."
  }
}

variable "psi_threshold" {
  description = "Population stability index of a numeric feature's binned distribution above which the data counts as drifted."
  type        = number
  default     = 0.2
  validation {
    condition     = var.psi_threshold >= 0
    error_message = "psi_threshold is 0 or more."
  }
}

variable "feature_drift_thresholds" {
  description = "Per feature, its own drift thresholds, e.g. { income = { js_distance = 0.2, psi = 0.5 } }; other features use drift_threshold and psi_threshold."
  type        = map(map(number))
  default     = {}
  validation {
    condition     = alltrue([for own in values(var.feature_drift_thresholds) : length(own) > 0 && alltrue([for k, v in own : contains(["js_distance", "psi"], k) && v >= 0])])
    error_message = "feature_drift_thresholds maps a feature to js_distance and/or psi, each 0 or more."
  }
}

variable "label_drift_threshold" {
  description = "L-infinity distance between the class distribution of the new data and of the training data above which the data counts as drifted."
  type        = number
  default     = 0.1
  validation {
    condition     = var.label_drift_threshold >= 0
    error_message = "label_drift_threshold is a distance: 0 or more."
  }
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

variable "schedule_parameter_values" {
  description = "Pipeline parameter values of the scheduled run (runtimeConfig.parameterValues), e.g. { data_source = \"gs://DATA_BUCKET/incoming/\", deploy_target = \"vertex\", deploy_settings = { ... } }; empty runs the template's defaults."
  type        = any
  default     = {}
  validation {
    condition     = can(keys(var.schedule_parameter_values))
    error_message = "schedule_parameter_values is a map of parameter name to value."
  }
}
