{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "djinn-bench.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: the release name, prefixed with the chart name unless it contains it. */}}
{{- define "djinn-bench.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "djinn-bench.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "djinn-bench.selectorLabels" -}}
app.kubernetes.io/name: {{ include "djinn-bench.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "djinn-bench.labels" -}}
helm.sh/chart: {{ include "djinn-bench.chart" . }}
{{ include "djinn-bench.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: djinn-bench
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. Argument: (list $repository $tag $root). */}}
{{- define "djinn-bench.imageRef" -}}
{{- $repo := index . 0 -}}{{- $tag := index . 1 -}}{{- $root := index . 2 -}}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $tag) -}}
{{- end -}}

{{/* The all-in-one image (runner/client, CPU server, Ray head on CPU). */}}
{{- define "djinn-bench.image" -}}
{{- include "djinn-bench.imageRef" (list .Values.image.repository .Values.image.tag .) -}}
{{- end -}}

{{/* The operator image: operator.image, else the all-in-one image. */}}
{{- define "djinn-bench.operatorImage" -}}
{{- if .Values.operator.image.repository -}}
{{- include "djinn-bench.imageRef" (list .Values.operator.image.repository .Values.operator.image.tag .) -}}
{{- else -}}
{{- include "djinn-bench.image" . -}}
{{- end -}}
{{- end -}}

{{/* The GPU server image, or "" when serverImage.repository is empty. */}}
{{- define "djinn-bench.serverImage" -}}
{{- if .Values.serverImage.repository -}}
{{- include "djinn-bench.imageRef" (list .Values.serverImage.repository .Values.serverImage.tag .) -}}
{{- end -}}
{{- end -}}

{{- define "djinn-bench.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "djinn-bench.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "djinn-bench.workloadServiceAccountName" -}}
{{- if .Values.workloadServiceAccount.create -}}
{{- default (printf "%s-workload" (include "djinn-bench.fullname" .)) .Values.workloadServiceAccount.name -}}
{{- else -}}
{{- .Values.workloadServiceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "djinn-bench.minioName" -}}
{{- printf "%s-minio" (include "djinn-bench.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* S3 endpoint: s3.endpoint, else the in-cluster MinIO service when minio.enabled, else "" (AWS). */}}
{{- define "djinn-bench.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "djinn-bench.minioName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* S3 region: s3.region, else us-east-1 for MinIO, else "" (the AWS default chain). */}}
{{- define "djinn-bench.s3Region" -}}
{{- if .Values.s3.region -}}
{{- .Values.s3.region -}}
{{- else if .Values.minio.enabled -}}
us-east-1
{{- end -}}
{{- end -}}

{{/* Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or "". */}}
{{- define "djinn-bench.s3CredentialsSecret" -}}
{{- if .Values.s3.credentialsSecret -}}
{{- .Values.s3.credentialsSecret -}}
{{- else if .Values.minio.enabled -}}
{{- include "djinn-bench.minioName" . -}}
{{- end -}}
{{- end -}}

{{/* s3://bucket/prefix */}}
{{- define "djinn-bench.s3Uri" -}}
{{- $prefix := trimAll "/" .Values.s3.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" .Values.s3.bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}

{{/* Environment of every pod that talks to S3. */}}
{{- define "djinn-bench.s3Env" -}}
{{- $endpoint := include "djinn-bench.s3Endpoint" . -}}
{{- $region := include "djinn-bench.s3Region" . -}}
{{- if $endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ $endpoint | quote }}
{{- end }}
{{- if $region }}
- name: AWS_REGION
  value: {{ $region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ $region | quote }}
{{- end }}
{{- end -}}

{{/* Pod and container security settings shared by the chart's own pods (uid 10001 of the images). */}}
{{- define "djinn-bench.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "djinn-bench.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}
