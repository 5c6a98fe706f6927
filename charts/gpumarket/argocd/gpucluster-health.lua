-- Argo CD health of a gpumarket GpuCluster, from status.phase and status.conditions.
-- Argo CD runs this with the object in `obj` (gopher-lua, Lua 5.1); it must return {status, message}.
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

-- The first of these conditions that is False says why a cluster is still waiting.
local function waiting_reason(status, fallback)
  for _, type in ipairs({ "Funded", "Matched", "RayReady" }) do
    local c = condition(status, type)
    if c ~= nil and c.status == "False" and c.message ~= nil and c.message ~= "" then
      return c.message
    end
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller to observe the latest spec"
  return hs
end

local phase = status.phase
if phase == "Running" then
  local degraded = condition(status, "Degraded")
  if degraded ~= nil and degraded.status == "True" then
    hs.status = "Degraded"
    hs.message = degraded.message or "Running with lost GPUs"
  else
    hs.status = "Healthy"
    hs.message = "Ray cluster running"
  end
elseif phase == "Completed" then
  hs.status = "Healthy"
  hs.message = "Ran its duration and was settled"
elseif phase == "Failed" then
  local degraded = condition(status, "Degraded")
  hs.status = "Degraded"
  if degraded ~= nil and degraded.message ~= nil then
    hs.message = degraded.message
  else
    hs.message = waiting_reason(status, "Failed")
  end
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = waiting_reason(status, "Waiting for matching GPUs")
elseif phase == "Matched" or phase == "Provisioning" then
  hs.status = "Progressing"
  hs.message = waiting_reason(status, "GPUs bound, Ray cluster starting")
elseif phase == "Expiring" then
  hs.status = "Progressing"
  hs.message = "Duration is up: tearing down and settling"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
