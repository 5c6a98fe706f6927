-- Argo CD health of a gpumarket GpuOffer, from per-GPU health (written by the supplier agent)
-- and the Available condition (written by the controller).
-- Argo CD runs this in gopher-lua (Lua 5.1) with the object in `obj` and only the base, table
-- and os libraries open (no string or math); it returns {status, message}. tests/tests/chart.rs
-- runs it through Argo CD's own code (hack/tools/argocd-health).
local hs = {}

local function condition(status, type)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the first heartbeat of the supplier agent"
  return hs
end

-- A GPU the agent reports unhealthy is Degraded at once, whatever the controller has seen.
local gpus = status.gpus or {}
local unhealthy, first = 0, nil
for _, g in ipairs(gpus) do
  if g.health == "Unhealthy" then
    unhealthy = unhealthy + 1
    first = first or g
  end
end
if unhealthy > 0 then
  hs.status = "Degraded"
  local example = tostring(first.uuid)
  if first.reason ~= nil and first.reason ~= "" then
    example = example .. ": " .. first.reason
  end
  hs.message = unhealthy .. " of " .. #gpus .. " GPUs unhealthy (" .. example .. ")"
  return hs
end

local healthy = condition(status, "Healthy")
if healthy ~= nil and healthy.status == "False" then
  hs.status = "Degraded"
  hs.message = healthy.message or "GPUs unhealthy"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller to assess the latest spec"
  return hs
end

local available = condition(status, "Available")
if available == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller to assess the offer"
elseif available.status == "True" then
  hs.status = "Healthy"
  hs.message = tostring(status.freeGpus or 0) .. " of " .. #((obj.spec or {}).gpus or {}) .. " GPUs free"
else
  hs.status = "Degraded"
  hs.message = available.message or "Not available"
end
return hs
