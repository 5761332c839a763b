{{/*
The image every strait container runs.
*/}}
{{- define "strait.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/*
Labels of a component's objects: app.kubernetes.io/name as the
manifests have it (the selectors), part-of, and Helm's own.
*/}}
{{- define "strait.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: strait
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/*
What is installed: the components asked for, as the topology allows.
*/}}
{{- define "strait.broker" -}}
{{- if .Values.components.broker }}true{{ end }}
{{- end }}
{{- define "strait.controlPlane" -}}
{{- if and .Values.components.controlPlane (ne .Values.topology "remote") }}true{{ end }}
{{- end }}
{{- define "strait.webhook" -}}
{{- if and .Values.components.webhook (include "strait.controlPlane" .) }}true{{ end }}
{{- end }}
{{- define "strait.gateway" -}}
{{- if .Values.components.gateway }}true{{ end }}
{{- end }}

{{/*
The checks values.schema.json cannot make: those across values. Each
failure names the value to set.
*/}}
{{- define "strait.validate" -}}
{{- $v := .Values -}}
{{- if ne .Release.Namespace "strait-system" }}
{{- fail (printf "namespace %q: install into namespace strait-system (-n strait-system --create-namespace): the control plane's certificate names controlplane.strait-system.svc, and a primary finds a remote's network on Namespace strait-system" .Release.Namespace) }}
{{- end }}
{{- if and $v.components.webhook (not $v.components.controlPlane) (ne $v.topology "remote") }}
{{- fail "components.webhook=true needs components.controlPlane=true: the control plane serves the injection webhook" }}
{{- end }}
{{- if eq $v.topology "remote" }}
{{- if $v.components.controlPlane }}
{{- fail "topology=remote runs no control plane (the primary serves this cluster): set components.controlPlane=false" }}
{{- end }}
{{- if $v.components.webhook }}
{{- fail "topology=remote has no injection webhook (it is served by a control plane): set components.webhook=false" }}
{{- end }}
{{- if not $v.remote.controlPlane }}
{{- fail "topology=remote needs remote.controlPlane: the primary's control plane as its gateway exposes it (HOST:PORT)" }}
{{- end }}
{{- if not (and $v.cluster.name $v.cluster.network) }}
{{- fail "topology=remote needs cluster.name and cluster.network: the primary finds this cluster's gateway by its network" }}
{{- end }}
{{- else if $v.remote.controlPlane }}
{{- fail (printf "remote.controlPlane is for topology=remote, not %s" $v.topology) }}
{{- end }}
{{- if eq $v.topology "primary-remote" }}
{{- if not $v.controlPlane.remotes }}
{{- fail "topology=primary-remote needs controlPlane.remotes: the remote clusters this control plane serves (name and kubeconfig Secret each)" }}
{{- end }}
{{- if not $v.components.controlPlane }}
{{- fail "topology=primary-remote needs components.controlPlane=true: the primary's control plane serves the remotes" }}
{{- end }}
{{- else if $v.controlPlane.remotes }}
{{- fail (printf "controlPlane.remotes is for topology=primary-remote, not %s" $v.topology) }}
{{- end }}
{{- if or $v.cluster.name $v.cluster.network $v.cluster.gateway }}
{{- if not (and $v.cluster.name $v.cluster.network) }}
{{- fail "cluster.name and cluster.network go together (ConfigMap strait-mesh holds both)" }}
{{- end }}
{{- if and (not $v.cluster.gateway) (include "strait.controlPlane" .) }}
{{- fail "cluster.gateway is needed with cluster.name: the address other clusters reach this cluster's gateway at (HOST:PORT)" }}
{{- end }}
{{- end }}
{{- if and (or $v.broker.meshName $v.broker.peerAdvertise) (ne $v.topology "federated") }}
{{- fail (printf "broker.meshName and broker.peerAdvertise are for topology=federated, not %s" $v.topology) }}
{{- end }}
{{- end }}
