-- Argo CD health of a gpumarket GpuCluster, from status.phase and status.conditions.
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

-- Why a cluster is not running (yet): the first of these conditions in the state that holds it
-- up, e.g. a deposit short of the price or no matching offers.
local function waiting_reason(status, fallback)
  for _, want in ipairs({ { "Funded", "False" }, { "Matched", "False" }, { "Degraded", "True" }, { "RayReady", "False" } }) do
    local c = condition(status, want[1])
    if c ~= nil and c.status == want[2] and c.message ~= nil and c.message ~= "" then
      return c.message
    end
  end
  return fallback
end

-- Why a cluster ended: the controller records the ending's reason and message on RayReady.
local function ending(status, fallback)
  local c = condition(status, "RayReady")
  if c == nil or c.status ~= "False" or c.reason == nil or c.message == nil then
    return fallback
  end
  return c.reason .. ": " .. c.message
end

local status = obj.status or {}
local phase = status.phase

-- Ended clusters are final: the controller no longer updates them, not even observedGeneration.
if phase == "Completed" then
  hs.status = "Healthy"
  hs.message = ending(status, "Ran its duration")
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = ending(status, "Failed")
  return hs
end

local generation = obj.metadata.generation
if phase ~= nil and generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller to observe the latest spec"
  return hs
end

if phase == nil or phase == "Pending" then
  hs.status = "Progressing"
  hs.message = waiting_reason(status, phase == nil and "Waiting for the gpumarket controller" or "Waiting for matching GPUs")
elseif phase == "Matched" or phase == "Provisioning" then
  hs.status = "Progressing"
  hs.message = waiting_reason(status, "GPUs bound, Ray cluster starting")
elseif phase == "Running" then
  local degraded = condition(status, "Degraded")
  if degraded ~= nil and degraded.status == "True" then
    hs.status = "Degraded"
    hs.message = degraded.message or "Running with workers short of GPUs"
  else
    hs.status = "Healthy"
    hs.message = "Ray cluster running"
  end
elseif phase == "Expiring" then
  -- Its duration is up or its escrow ran dry: the RayCluster and leases are being ended.
  hs.status = "Progressing"
  hs.message = "Ending: deleting the RayCluster and ending its leases"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
